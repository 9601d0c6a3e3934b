"""`imgindex serve`: an HTTP API and a web page over the indexes under one root.

A composition root like pipeline/cli.py: it may import cluster/.
"""
