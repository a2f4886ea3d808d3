"""Agents: pure functions over pytrees behind one interface (see `base.Agent`)."""
