"""The built-in task families, one file each, named in `engine.tasks.registry.FAMILIES`."""
