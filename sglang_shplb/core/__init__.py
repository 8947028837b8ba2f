"""The shared vocabulary every other part speaks: patterns and their budgets (:mod:`.patterns`), block
masks (:mod:`.block_masks`), context buckets (:mod:`.buckets`), the model identity (:mod:`.model_spec`),
placements (:mod:`.placement_types`), the plan file (:mod:`.plan`, the one reader and writer), the
head map (:mod:`.head_map`) and the head-parallel exchange rule (:mod:`.exchange`). It imports nothing
else of the package."""
