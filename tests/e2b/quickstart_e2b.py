# The quickstart of the e2b README: a sandbox, a command, a file.
from e2b import Sandbox

sandbox = Sandbox.create()
result = sandbox.commands.run('echo "Hello from E2B!"')
print(result.stdout)

sandbox.files.write("/home/user/hello.txt", "Hello, World!")
content = sandbox.files.read("/home/user/hello.txt")
print(content)
sandbox.kill()
