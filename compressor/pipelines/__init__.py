"""How data flows through a model while a method compresses it (the methods themselves are pure)."""
