"""Rubin/LSST support: QuantumGraph loading (:mod:`.qgraph`), BPS-style requests
(:mod:`.bps_config`), warm quantum execution (:mod:`.warm`), the zipfile gh-127847 fix
(:mod:`.zipfix`, :mod:`.tool`) and test tasks (:mod:`.testing_tasks`).

Only :mod:`.bps_config`, :mod:`.zipfix` and the pure parts of :mod:`.qgraph` and :mod:`.warm`
import without the middleware; everything that reads graphs or runs quanta needs
``pilot[lsst]`` on Python >= 3.12.
"""
