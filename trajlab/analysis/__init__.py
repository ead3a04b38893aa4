"""Pure analyses: xarray in, xarray out (jacobian, covariance, commitment, coverage, theory).

Kept light on purpose: import the submodules you need (``from trajlab.analysis import theory``).
"""
