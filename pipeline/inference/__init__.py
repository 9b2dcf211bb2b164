"""A run's maps: TTA views and inverses, the map file format, the member layout, running a member."""
