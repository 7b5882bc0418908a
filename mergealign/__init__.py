"""mergealign: merge domain and alignment vectors into safe domain experts, and measure the trade-off."""

__version__ = "0.1.0"
