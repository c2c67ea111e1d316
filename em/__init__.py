"""The EM experiment: an EM adapter trained on top of each persona adapter (stacked, never merged), the bare base
and secure-code controls beside them; the arms answer EM questions, a judge scores them, and the summary gives EM
rates with intervals, the phase curve and the difference in differences per persona."""
