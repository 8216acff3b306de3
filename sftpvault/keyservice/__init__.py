"""Key services (KEK holders) behind one interface (base.KeyService)."""
