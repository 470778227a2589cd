"""What Feast's CLI (`feast plan`, `feast apply`, `feast ui`) reads in this repository.

The definitions are built by nbs_lib.ml.feature_store from the feature table `nbs run` writes,
and applied by its feature_tables task; this file hands Feast what the registry holds, so
`feast apply` here changes nothing instead of deleting the feature views it would not find.
"""

from pathlib import Path

from nbs_lib.ml.feature_store import registered_definitions

globals().update(registered_definitions(Path(__file__).parent))
