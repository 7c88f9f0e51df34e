"""Embedded demos of tasks beyond classification (the classification demo is `padkd.demo`)."""
