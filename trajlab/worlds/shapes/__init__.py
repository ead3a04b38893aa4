"""trajlab.worlds.shapes: see ``trajlab.worlds.shapes.world`` (grammar, priors, geometry) and
``trajlab.worlds.shapes.judge`` (the attribute judge and its scores).

Public API: ``sample_scenes(n, seed)``, ``render(scene)``, ``caption(scene, rng=None)``,
``parse(prompt)``, ``prompt_distribution(prompt)``, ``prompt_probability(prompt)``,
``canonical_objects(scene)``.
"""

from . import world
from .world import (  # noqa: F401
    AXES,
    COLOURS,
    IMAGE_SIZE,
    OBJECT_ATTRIBUTES,
    OMIT,
    POSITIONS,
    PRIORS,
    RARE_COLOUR,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    UNIFORM_PRIORS,
    VALUES,
    canonical_objects,
    canonical_order,
    caption,
    format_prompt,
    nearest_form,
    parse,
    position_bucket,
    position_prior,
    prompt_distribution,
    prompt_probability,
    render,
    render_batch,
    sample_scenes,
    scene_axis,
)

__doc__ = (__doc__ or "") + "\n" + (world.__doc__ or "")
