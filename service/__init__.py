"""`imgindex serve`: an HTTP API and a web page over the indexes under one root.

A composition root like imgindex/cli/: it may import cluster/.
"""
