"""e2b-gateway: E2B's REST API, envd and code-interpreter protocols onto the executor.

Design: docs/E2B.md. The gateway keeps no sandbox state of its own: a
sandbox's tenant and template live in its executor metadata, envd access
tokens are derived from the sandbox id with the gateway's secret, and API
keys are a file of hashes (:mod:`.tenants`).
"""
