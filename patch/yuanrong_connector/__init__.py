"""YuanRongConnector: vLLM's KV connector interface on the openYuanrong data system."""
