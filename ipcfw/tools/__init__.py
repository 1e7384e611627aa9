"""The `ipcfw` command and what it runs: `cli` (the command line), `demo`, `bench`."""
