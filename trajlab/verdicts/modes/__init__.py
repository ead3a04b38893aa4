"""One file per failure mode; the catalogue (:mod:`trajlab.verdicts.catalogue`) lists them in report order."""
