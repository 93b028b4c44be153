"""Optional integrations with other training libraries (import each module explicitly)."""
