"""Agents: pure functions over pytrees behind one interface (see `base.Agent`).

AGENTS maps a spec's `agent` name to its config dataclass (the spec section of the same name) and its
constructor `make(config, observation_size, action_size) -> Agent`.
"""

from vecrl.agents.madtd import MadTDConfig, make_madtd
from vecrl.agents.mbpo import MBPOConfig, make_mbpo
from vecrl.agents.sac import SACConfig, make_sac
from vecrl.agents.svg import SVGConfig, make_svg

AGENTS = {"madtd": (MadTDConfig, make_madtd), "sac": (SACConfig, make_sac), "mbpo": (MBPOConfig, make_mbpo),
          "svg": (SVGConfig, make_svg)}
