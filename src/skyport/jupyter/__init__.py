"""JupyterHub terminal: :class:`SkyPortSpawner` starts each hub user's server as a Sky Port job.

``c.JupyterHub.spawner_class = "skyport.jupyter.SkyPortSpawner"`` (README, "JupyterHub"). Importing
this package needs the ``jupyter`` extra (``pip install 'skyport-wm[jupyter]'``).
"""

from skyport.jupyter.spawner import SkyPortSpawner

__all__ = ["SkyPortSpawner"]
