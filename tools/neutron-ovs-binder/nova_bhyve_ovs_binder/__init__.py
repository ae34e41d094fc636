"""An ML2 mechanism driver for an agentless all-in-one test cloud."""
