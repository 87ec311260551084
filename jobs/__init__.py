"""Entry points for batch jobs and the `refbank` command line."""
