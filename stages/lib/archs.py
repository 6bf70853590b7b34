"""The architectures `train.arch` may name, each as the "module:class" that builds it: one
list, which params checks names against before torch is imported, and from which
model.build_model imports only the module it needs."""

ARCHS = {
    "airbench": "stages.lib.nets:AirbenchNet",
    "lenet": "stages.lib.nets:LeNet",
    "resnet18": "stages.lib.resnets:ResNet18",
    "resnet18_imagenet": "stages.lib.resnets:ResNet18ImageNet",
    "mlp": "stages.lib.nets:QuickstartMLP",
    "mnist_mlp": "stages.lib.nets:MnistMLP",
}
