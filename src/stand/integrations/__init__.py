"""stand's drafters inside other engines. Each engine is an optional extra: nothing here is imported by core,
backends, drafters or the engine, and importing a subpackage never imports the engine it integrates with."""
