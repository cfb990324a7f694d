"""Many virtual sites on Flower's Ray simulation: the same ServerApp job and ClientApp as a real federation.

`simulate.sites` makes the virtual sites (one per bank, or one synthetic world split into N sites with
non-IID cancer mixes and varying sizes) and writes their banks; `simulate.engine` runs the job on Ray;
`simulate.cli` is ``cmoe-simulate``. It imports both ``client/`` and ``server/`` (it is both ends at once),
which is why it is a package of its own: neither of them imports it.
"""
