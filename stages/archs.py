"""The architectures `train.arch` may name, each as the "module:class" that builds it: one
list, which params checks names against before torch is imported, and from which
model.build_model imports only the module it needs."""

ARCHS = {
    "airbench": "stages.nets:AirbenchNet",
    "lenet": "stages.nets:LeNet",
    "resnet18": "stages.resnets:ResNet18",
    "resnet18_imagenet": "stages.resnets:ResNet18ImageNet",
    "mlp": "stages.nets:QuickstartMLP",
    "mnist_mlp": "stages.nets:MnistMLP",
}
