"""The ReCALL stages. Each reads and writes artifacts in the workdir and is done when its manifest exists."""
