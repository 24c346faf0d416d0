# The quickstart of the e2b-code-interpreter README (its `load_dotenv()` line
# left out: the environment comes from `agent-vm e2b env` here).
from e2b_code_interpreter import Sandbox

sbx = Sandbox.create()  # By default the sandbox is alive for 5 minutes
execution = sbx.run_code("print('hello world')")  # Execute Python inside the sandbox
print(execution.logs)

files = sbx.files.list("/")
print(files)
sbx.kill()
