"""Embedded demos of tasks beyond classification (the classification demo is `padkd.demo`): they train
small runs end to end, on digits or on data they generate (detection: shapes in the COCO format)."""
