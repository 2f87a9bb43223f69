"""Built-in fer plugins; each module is registered through the fer.plugins entry-point group."""
