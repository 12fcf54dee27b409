"""The sdloop command line: wires the stages of the loop."""
