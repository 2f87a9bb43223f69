"""Example third-party plugin for fer."""
