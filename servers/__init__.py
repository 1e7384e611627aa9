"""Example server plugins: host one with ``ipcfw serve servers.echo:EchoServer``."""
