"""Pure analyses: xarray in, xarray out (jacobian, covariance, commitment, coverage, speciation, theory;
labellers builds the labellers commitment uses). `io` holds what the scripts in analyses/ share around
them: open a store's groups, resolve the model a group was captured with, save results and figures.

Kept light on purpose: import the submodules you need (``from trajlab.analysis import theory``).
"""
