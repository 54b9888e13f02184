"""transformers' own tests run against glmkit (see conftest.py); a package so its conftest is not `conftest`."""
