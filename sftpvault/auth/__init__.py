"""Authentication backends behind one interface (base.AuthBackend)."""
