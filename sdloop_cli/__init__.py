"""The ``sdloop`` command line: the only package that imports the stages (``finetune``, ``export``, ``bento``,
``monitor``); each module parses one group of commands and calls its stage. ``main`` assembles them."""
