"""pigeon.tools: the ``pigeon`` command line, documentation generators, service files."""
