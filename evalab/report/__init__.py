"""The applications on top of the engine: figure helpers, ``evalab reproduce``, ``evalab bench`` and the
notebook widgets. They read results and call the public engine; nothing below imports them."""
