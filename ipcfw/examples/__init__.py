"""The example servers and clients, as the installed package carries them.

In a source checkout they live at the top: ``servers/`` (plugins, e.g. ``ipcfw serve
servers.echo:EchoServer``) and ``clients/`` (programs). The wheel maps those two directories
here, as ``ipcfw.examples.servers`` and ``ipcfw.examples.clients`` (pyproject.toml's
``package-dir``), so that ``ipcfw demo`` and ``ipcfw serve ipcfw.examples.servers.echo:EchoServer``
work from an installed wheel with no checkout at all.
"""
