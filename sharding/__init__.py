"""Meshes, the logical-axis rules table and parallel strategies (expert, pipeline, data)."""
