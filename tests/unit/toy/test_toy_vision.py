"""The toy vision tower's scene objective and its pretraining."""

import torch

from mmdc.toy import models, vision, world

# A hand-made scene: two red shapes (a square and a circle), a blue square.
#   row 0: .  R-sq  .  .
#   row 1: .  .     .  B-sq
#   row 2: R-ci .   .  .
SCENE = {"kind": "objects", "objects": [
    {"row": 0, "col": 1, "shape": "square", "color": "red"},
    {"row": 1, "col": 3, "shape": "square", "color": "blue"},
    {"row": 2, "col": 0, "shape": "circle", "color": "red"},
]}
MAGNETS = {"kind": "magnets", "row": 3, "poles": ["N", "S", "S", "N"]}


def test_cell_targets_of_a_hand_made_scene():
    t = vision.cell_targets(SCENE)
    red_square = vision.content_class(SCENE["objects"][0])
    red_circle = vision.content_class(SCENE["objects"][2])
    blue_square = vision.content_class(SCENE["objects"][1])
    assert len({red_square, red_circle, blue_square, 0}) == 4
    assert t["content"][1] == red_square and t["content"][7] == blue_square
    assert t["content"][8] == red_circle and t["content"][0] == 0
    assert t["row"][7] == 1 and t["col"][7] == 3
    # two red shapes, one blue; two squares, one circle; three shapes in all
    assert (t["same_color"][1], t["same_color"][8], t["same_color"][7]) == (2, 2, 1)
    assert (t["same_shape"][1], t["same_shape"][7], t["same_shape"][8]) == (2, 2, 1)
    assert t["same_color"][0] == vision.IGNORE  # an empty cell has no colour
    assert set(t["total"]) == {3}
    # neighbours: the red square's left is empty, the cell left of it (0) has it on its right
    assert t["left"][1] == 0 and t["right"][0] == red_square
    assert t["left"][0] == vision.EDGE and t["right"][7] == vision.EDGE


def test_cell_targets_of_magnets():
    t = vision.cell_targets(MAGNETS)
    north, south = vision.N_CONTENT - 2, vision.N_CONTENT - 1
    assert t["content"][12:16] == [north, south, south, north]
    # the facing poles across the gap see each other as neighbours
    assert t["right"][13] == south and t["left"][14] == south
    assert set(t["total"]) == {0} and set(t["same_color"]) == {vision.IGNORE}


def test_objective_counts_only_targets_that_apply():
    labels = vision.batch_labels([SCENE, MAGNETS])
    objective = vision.SceneObjective(hidden=8)
    loss, hits = objective(torch.randn(2, vision.CELLS, 8), labels)
    assert torch.isfinite(loss) and loss.item() > 0
    # colour and shape counts apply to the 3 shapes only; content to every cell
    assert hits["same_color"][1] == 3 and hits["same_shape"][1] == 3
    assert hits["content"][1] == 2 * vision.CELLS


def test_a_few_pretraining_steps_learn_and_leave_a_plain_clip_tower():
    tower = models.build_vision_tower(seed=0)
    image_processor = models.build_image_processor()
    recipe = vision.VisionRecipe(steps=30, batch_size=32)
    objective = vision.SceneObjective(tower.config.hidden_size)
    before = vision.evaluate_tower(tower, objective, image_processor, n=64, recipe=recipe)
    stats = vision.pretrain_tower(tower, image_processor, recipe, seed=0)
    assert stats["steps"] == 30 and set(stats["heldout_acc"]) == set(vision.TARGETS)
    # after 30 steps the row / column heads read positions far better than chance
    assert stats["heldout_acc"]["row"] > 60 and before["row"] < 60
    assert type(tower).__name__ == "CLIPVisionModel" and not tower.training


def test_scene_objects_only_for_object_scenes():
    assert len(world.scene_objects(SCENE)) == 3 and world.scene_objects(MAGNETS) == []
