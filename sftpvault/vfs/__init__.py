"""The users' file system: path jail, atomic open files, encrypting handle."""
