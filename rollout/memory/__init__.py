"""Device memory the engine can hand back: arenas whose views survive release and restore."""
