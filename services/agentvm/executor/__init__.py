"""executor service: runs agent code in VMs (AgentExecutor) behind ExecutorService."""
