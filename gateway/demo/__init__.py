"""The demo network: three fictional-data applications, their forces and the scripted tour."""
