"""The end-to-end run: bootstrap loop, EM experiment, cost, report."""
