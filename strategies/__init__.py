"""User strategy classes: name one in a scenario as ``strategy: {class: "strategies.module:Class"}``."""
