"""Importing this module registers r4b's policy loss and advantage estimators with verl.

``VERL_USE_EXTERNAL_MODULES=r4b_kernels.integrations.verl_plugin`` makes every verl process
import it (see :func:`r4b_kernels.integrations.verl.register`).
"""

from .verl import register

register()
