"""sdloop: the shared layer every stage imports (workspace, atomic IO, run folders, errors, seeding, descriptors)
and the command line (``sdloop_cli.main``), the only module that imports the stages."""

import logging as _logging

# diffusers logs "Multiple distributions found for package optimum" at import: optimum-onnx installs its modules into
# optimum's namespace package, so two distributions own `optimum/`. That is how optimum's extensions are meant to be
# installed, not a conflict; the check is diffusers' own (utils/import_utils.py), so its logger is the place to quiet.
_logging.getLogger("diffusers.utils.import_utils").setLevel(_logging.ERROR)
