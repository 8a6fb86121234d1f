"""The store kinds: base classes that the factories bind to a name and codecs."""
