"""The live web viewer (viser, the optional extra ``clm[viewer]``): a model rendered through its
engine at each browser's camera, while it trains (``clm-train --viewer``) or once trained
(``clm-view``)."""
