"""Demos that train small runs end to end on data they generate (detection: shapes in the COCO format)."""
